"""How bytes reach the disk and come back: durable steps, O_DIRECT writes, CRC32s,
paths reached without following links, the trash, and the threads that do it off training."""
