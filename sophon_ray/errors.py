"""User-facing errors: the CLI turns these into one line and exit code 2."""


class UserError(Exception):
    """Bad input (unknown name, wrong shape, missing data, tampered file, impossible config).

    The message must name what to fix; the CLI prints it on one line and exits with code 2.
    """
