"""`python -m data_prep`: the sift-prep command line."""
import sys

from data_prep.cli import main

sys.exit(main())
