"""Ringfence's root-side session plumbing that runs outside the services.

Everything here is standard library only and runs under `python3 -I -S`
(isolated: no PYTHONPATH, no user site, no site-packages), so nothing in the
caller's environment can change what it imports or does:

  pam_hook.py    sshd's PAM hook (pam_exec, root): admits and places the connection
  ssh_session.py sshd's ForceCommand wrapper (the user): hands its stdio to the enforcer
  relayd.py      started by the enforcer (root): forks one relay per session
  relay.py       one per session (root): owns the pty or pipes, runs the program as the
                 login, relays, records, times out idle input
  wire.py        the enforcer socket protocol these speak

The services decode what these write with the msgspec Structs of
ringfence/contract (api.py, relay.py); tests check that they agree.
"""
