"""torch.library registration of llmfast's ops: fake (meta) kernels, autograd, and the Triton
kernels wrapped as custom ops. Importing this package registers everything."""
from . import attention  # noqa: F401
from . import cross_entropy  # noqa: F401
from . import norm  # noqa: F401
