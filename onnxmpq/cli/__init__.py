"""The command line (click): `main` holds the group and the entry point, `quantize` and `measure` and
`deploy` the commands, `options` the option groups built from the run configuration, `common` what they
share."""
