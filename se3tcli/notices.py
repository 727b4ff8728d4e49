"""Notices of slow work done once (compiling the CPU attention kernel, building the QM9 cache), so that
a wait is explained: one line each, logged at INFO on :data:`NOTICES`; and warnings about data as a whole
(labelled records skipped, labels that are se3t's own predictions), at WARNING. The command line shows
them on stderr (``se3tcli.cli``); a Python program sees the warnings, and the notices where it enables
INFO logging."""

import logging

NOTICES = logging.getLogger("se3tcli.notices")
