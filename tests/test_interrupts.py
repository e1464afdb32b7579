"""Signals in-process: deferred delivery around native code, handlers restored, ignored signals left alone.
The same signals against real processes (exit codes, cleanup) are in test_faults_processes.py."""
import signal

import pytest

from onex_export import interrupts


@pytest.fixture(autouse=True)
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_inside_deferred_is_recorded_then_delivered_to_the_handler_of_before():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as raised:
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)  # raised in a native callback this would be swallowed
            assert interrupts.requested()  # what TensorRT's progress monitor polls
            reached_the_end = True
    assert reached_the_end and not isinstance(raised.value, interrupts.Interrupted)
    assert not interrupts.requested()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_installed_handlers_raise_interrupted_with_the_shell_exit_code():
    interrupts.install()
    with pytest.raises(interrupts.Interrupted) as term:
        signal.raise_signal(signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as intr:
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
    assert (term.value.exit_code, intr.value.exit_code) == (143, 130)
    assert isinstance(term.value, KeyboardInterrupt)  # unwinds like Ctrl-C through `except Exception`


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a shell's background job
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    with interrupts.deferred():
        signal.raise_signal(signal.SIGINT)
        assert not interrupts.requested()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
