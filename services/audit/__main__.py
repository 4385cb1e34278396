"""python -m services.audit"""

from ringfence.runtime.service import run_service

from .adapter import make_adapter

if __name__ == "__main__":
    run_service("audit", make_adapter)
