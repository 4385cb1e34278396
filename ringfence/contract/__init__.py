"""The wire contract: every resource, request, event, subject and bucket name.

Every service imports this package and nothing of another service. Import the module you
need (`from ringfence.contract import names`); the package imports none of them itself, so
a CLI command pays only for what it uses.
"""
