"""Port program: an actor drives a long-lived calculator program through a process port.

Run it:  python examples/port_program.py "1+2" "6*7" "(2+3)*4"
         (--program bc|python: bc -q when installed, else a small Python calculator)

As Erlang's ``open_port({spawn_executable, ...}, [{packet, line}, exit_status])``: the
program's stdin and stdout are the port, one request line in, one answer line out; when
its input ends it exits and the port delivers its exit status, then ``Closed``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence

import ioserver
import ports

# The fallback calculator: one line in, one line out; exits 0 at the end of its input.
PYTHON_CALCULATOR = """\
import sys
for line in sys.stdin:
    try:
        print(eval(line, {"__builtins__": {}}))
    except Exception as error:
        print(f"error: {error}")
    sys.stdout.flush()
"""


def calculator(choice: str) -> list[str]:
    """The argv of the calculator program: ``bc -q`` or the Python fallback."""
    if choice == "bc" or (choice == "auto" and shutil.which("bc")):
        return ["bc", "-q"]
    return [sys.executable, "-c", PYTHON_CALCULATOR]


async def calculate(
    ios: ioserver.IOServer, argv: list[str], expressions: Sequence[str]
) -> int | None:
    """Ask the program for each expression in turn; return its exit status."""
    # stderr="stdout": bc reports errors on stderr; merged, they answer the request too.
    async with await ports.open_process(ios, argv, packet="line", stderr="stdout") as port:
        for expression in expressions:
            await port.send(expression.encode() + b"\n")
            answer = await port.receive()
            if not isinstance(answer, ports.Data):
                print(f"the calculator stopped: {answer}")
                return None
            print(f"{expression} = {answer.data.decode().strip()}", flush=True)
        await port.send_eof()  # its stdin ends: a calculator then exits
        async for message in port:
            if isinstance(message, ports.ExitStatus):
                print(f"{argv[0]} exited with status {message.status}", flush=True)
        return port.exit_status


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="port_program", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--program", choices=["auto", "bc", "python"], default="auto", help="the calculator"
    )
    parser.add_argument("expressions", nargs="*", default=["1+2", "6*7", "(2+3)*4"])
    options = parser.parse_args(argv)
    program = calculator(options.program)
    print(f"calculator: {' '.join(program[:2]) if program[0] == 'bc' else 'python'}", flush=True)
    await calculate(ios, program, options.expressions)


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
