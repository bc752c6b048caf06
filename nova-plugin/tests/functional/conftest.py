# The functional tests run Nova's services in process under eventlet, as
# Nova's own functional tests do, with testtools (see test_template_boot.py),
# not inside the shims' pytest session.
collect_ignore_glob = ["*.py"]
