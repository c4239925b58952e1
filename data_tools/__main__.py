"""`python -m data_tools ...` is the same as the `vmae-shards` console script."""

from data_tools.cli import main

raise SystemExit(main())
