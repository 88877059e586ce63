#!/bin/sh
# sbx image self-test: echo standard input back, line by line.
while IFS= read -r line; do
    printf '%s\n' "$line"
done
