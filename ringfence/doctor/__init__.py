"""`ringfence doctor`'s checks: which sshd and PAM settings open a hole in Ringfence's controls.

Pure: they read the text of `sshd -T`, sshd_config files and PAM files and return
findings (setting, value seen, why it matters, the fix); running sshd and reading
files is ringfence/cli/doctor.py's job.

  findings.py       Finding, Install, and the hook command forms Ringfence expects
  sshd_settings.py  one effective sshd configuration (`sshd -T`), trusted CAs
  sshd_match.py     Match blocks: a connection each applies to (`sshd -T -C`), what it adds
  pam_stack.py      sshd's PAM stack: includes followed, Ringfence's line judged in it
  hook_files.py     the files the hooks run must be root's alone
"""
