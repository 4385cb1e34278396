"""python -m services.locks"""

from ringfence.runtime.service import run_service

from .adapter import make_adapter

if __name__ == "__main__":
    run_service("locks", make_adapter)
