import sys

from .signals import install_at_startup, startup_interrupt_message

install_at_startup()  # before the imports below (torch takes seconds): a Ctrl-C there is a one-line message
try:
    from .cli import main
except KeyboardInterrupt as stop:
    print(f"error: {startup_interrupt_message(stop)}", file=sys.stderr)
    raise SystemExit(getattr(stop, "exit_code", 130)) from None

main()
