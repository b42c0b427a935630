#!/usr/bin/env python3
"""Create N files of 1 KiB under TOP, spread over 100 directories (the file-creation workload
of fio-bench.sh and write-bench.sh): create_files.py TOP N"""
import os
import sys

top, n = sys.argv[1], int(sys.argv[2])
data = b"x" * 1024
os.mkdir(top)
for d in range(100):
    os.mkdir(f"{top}/d{d:02}")
for i in range(n):
    fd = os.open(f"{top}/d{i % 100:02}/f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)
