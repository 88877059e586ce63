#!/bin/sh
# Compile the C and the C++ echo programs, feed stdin through both.
set -e
cd /tmp
gcc -O2 -o echo-c /opt/sbx-test/echo.c
g++ -O2 -o echo-cpp /opt/sbx-test/echo.cpp
./echo-c | ./echo-cpp
