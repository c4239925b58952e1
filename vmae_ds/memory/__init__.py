"""Memory: what autograd saves (counted on fake tensors), what ZeRO keeps, and the plan that fits a device."""
