"""sbx image self-test: echo standard input back."""
import sys

for line in sys.stdin:
    sys.stdout.write(line)
