"""Admin pages: users, the audit log, the throughput and model dashboard, sends to the PACS.

`bp` (defined in admin/blueprint.py) carries every admin view: the dashboard
from admin/routes.py, accounts and the audit log from admin/users.py, sends to
the PACS from admin/pacs.py. These modules import the blueprint, never each
other; importing this package registers every set of views.
"""

from webapp.admin import pacs, routes, users  # noqa: F401  (each adds its views to bp)
from webapp.admin.blueprint import bp

__all__ = ["bp"]
