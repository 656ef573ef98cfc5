"""md4: masked (absorbing) diffusion models for discrete data (MD4, GenMD4) in PyTorch."""

from md4 import schedules
from md4.diffusion import MD4
from md4.errors import UserError
from md4.genmd4 import GenMD4
from md4.pretrained import Pretrained, load
from md4.version import __version__

__all__ = ["MD4", "GenMD4", "Pretrained", "UserError", "__version__", "load", "schedules"]
