"""Segmentation networks.  Each module registers one network; this list is the one place to add one."""

from .registry import CLASS_NAMES, NetworkSpec, Recipe, get_network, network_names, register  # noqa: F401

# one line per network, in the order the GUI lists them
from . import unet  # noqa: F401,E402
from . import ms_unet  # noqa: F401,E402
from . import msa_cpp_unet  # noqa: F401,E402
from . import qchc_unet3d  # noqa: F401,E402
from . import chs_net  # noqa: F401,E402
