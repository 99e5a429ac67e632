"""The packaged smoke tests, collected from the clone: pytest tests/smoke --inventory FILE."""

from overlaylab.smoke.test_cluster import *  # noqa: F403
