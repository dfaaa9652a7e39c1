"""Build hook for the one compiled part: the CPU assignment solver ``flowkit.ot._auction``.

Everything else (metadata, dependencies) lives in pyproject.toml. The extension is optional:
without a C compiler the install still succeeds and flowkit uses its pure-torch solvers
(``flowkit.ot.compiled_auction_available()`` says which one runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("flowkit.ot._auction", ["flowkit/ot/_auction.c"], optional=True)])
