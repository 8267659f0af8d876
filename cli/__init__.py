"""The click front end (installed as ``surgery_cli``): parse, call the library, print."""
