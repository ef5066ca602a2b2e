"""Model families beyond the MDEQ: each module registers its builders with
:func:`experiments.models.register` on import."""

import experiments.families.cpl  # noqa: F401,E402
import experiments.families.lyadeq  # noqa: F401
import experiments.families.otad  # noqa: F401,E402
