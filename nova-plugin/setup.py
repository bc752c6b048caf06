"""Only for the .pth file: pyproject.toml cannot put a file at the root of
site-packages, where the interpreter reads .pth files (see
nova_virt_vmthunder/__init__.py for why the plugin needs one)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "nova_virt_vmthunder.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
