from llumnix_py.frontend.cluster import Cluster  # noqa: E402
from llumnix_py.frontend.handles import RequestHandle  # noqa: E402