"""The wire contract: every resource, request, event, subject and bucket name.

Every service imports this package and nothing of another service.
"""

from . import api, events, names, resources, streams, strict

__all__ = ["api", "events", "names", "resources", "streams", "strict"]
