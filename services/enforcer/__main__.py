"""python -m services.enforcer"""

from ringfence.runtime.service import run_service

from .adapter import make_adapter

if __name__ == "__main__":
    run_service("enforcer", make_adapter)
