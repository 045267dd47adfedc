"""
Test support for policyd: a real Postfix test bed and policyd as a process.

Used by policyd's own tests and by the scenario runners in ``bench/``;
installed with policyd (like `twisted.internet.testing`), importable
without pytest, and never imported by policyd itself.  The modules:

- `policyd.testing.daemon`: `PolicydProcess`, ``policyd serve`` as a child
  process whose log and output the caller waits on;
- `policyd.testing.postfix`: a private, throw-away Postfix instance
  (``postfix -c DIR``), its configuration and its maillog;
- `policyd.testing.smtp`: SMTP clients (`smtplib` with XCLIENT, and
  smtp-source(1)) to drive mail through it;
- `policyd.testing.netns`: a private network namespace for Postfix and
  policyd, where master(8) can enter stress mode;
- `policyd.testing.bed`: Postfix and the policyd it asks, together;
- `policyd.testing.system`: finding programs, running them, ``/proc``,
  free ports and bounded waits.

Nothing here installs anything: where a program is missing, the finders
(`policyd.testing.postfix.find_postfix`, `policyd.testing.netns.find_ip`)
raise `policyd.testing.system.Unavailable`.  The end-to-end tests need root
and Debian's postfix and iproute2, which ``tests/run`` installs as root.
"""
