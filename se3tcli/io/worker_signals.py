"""Imported only by the forkserver of the conformer workers (its preload, see ``conformer_pool``): blocks
Ctrl-C (SIGINT) in the server. A terminal's Ctrl-C reaches every process of the foreground group; a
worker forked just then would die of it inside multiprocessing's start-up code and print a traceback.
Forked with SIGINT blocked, a worker holds it pending until it ignores SIGINT and unblocks it
(``conformer_pool._serve``). Other forks of the same server (another forkserver pool in the same
program) inherit the block too.
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
