// CNimbusZlib: raw-deflate helpers for qcow2 compressed clusters. Why a shim: zlib's stream API
// is macro- and struct-heavy; these two calls are all the disk layer needs.
#ifndef CNIMBUSZLIB_H
#define CNIMBUSZLIB_H
#include <stddef.h>
#include <stdint.h>

/// Inflates raw deflate data (no zlib header, window 2^12 as qcow2 writes it, larger accepted)
/// into exactly `out_len` bytes. Returns 0 on success, -1 if the data is corrupt or too short.
int nimbus_inflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);

/// Deflates `in` as raw deflate (window 2^12). Returns the compressed size, or 0 if it would not
/// fit in `out_cap` bytes (the caller then stores the data uncompressed).
size_t nimbus_deflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap);
#endif
