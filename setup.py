"""The one compiled module, optional: without a C compiler laiontools installs and runs the same code
in Python (laiontools/wds/_tarfast.c says which; tests/test_tarfast.py compares the two)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("laiontools.wds._tarfast", ["laiontools/wds/_tarfast.c"], optional=True,
                             extra_compile_args=["-O2"])])
