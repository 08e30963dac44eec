"""The one compiled module, optional: without a C compiler laiontools installs and runs the same code
in Python (laiontools/wds/tarfast.c says which; tests/test_tarfast.py compares the two)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("laiontools.wds.tarfast", ["laiontools/wds/tarfast.c"], optional=True,
                             extra_compile_args=["-O2"])])
