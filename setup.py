"""Package discovery; pyproject.toml holds everything else. Every package under fcmae/ is found, so a new
one cannot be left out of the wheel (tests/test_packaging.py builds one and compares); conf/ ships as
fcmae.conf, its config groups as its subpackages (Hydra reads them as pkg://fcmae.conf)."""
from setuptools import find_namespace_packages, find_packages, setup

CONF = ["fcmae.conf"] + [f"fcmae.conf.{group}" for group in find_namespace_packages(where="conf")]
setup(packages=find_packages(include=["fcmae", "fcmae.*"]) + CONF, package_dir={"fcmae.conf": "conf"},
      package_data={name: ["*.yaml"] for name in CONF})
