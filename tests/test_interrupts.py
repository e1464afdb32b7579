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
    interrupts._raised = None  # what an entry point's install() does: no later test inherits an interrupt


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


def test_an_interrupt_that_native_code_turned_into_its_own_error_is_reported_as_the_interrupt(capsys):
    """safetensors, reading a tensor when SIGINT arrived, raised `ValueError: could not determine the shape of
    object type 'torch.storage.UntypedStorage'` in place of the interrupt: the build then ended in a traceback and
    exit 1, not 130 (seen once in test_faults_processes)."""
    from onex_export.exits import errors_reported

    def native_read():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    interrupts.install()
    with pytest.raises(SystemExit) as exit_info:
        with errors_reported():
            native_read()
    assert exit_info.value.code == 130 and "interrupted (SIGINT)" in capsys.readouterr().err
    interrupts.install()  # the next entry point: a bug is a bug again, with its traceback
    with pytest.raises(ValueError, match="a real bug"):
        with errors_reported():
            raise ValueError("a real bug")
