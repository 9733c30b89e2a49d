"""Kept per the design card; all metadata lives in pyproject.toml."""
from setuptools import setup

setup()
