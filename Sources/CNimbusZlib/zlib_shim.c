// CNimbusZlib: implementations over zlib's stream API.
#include "CNimbusZlib.h"
#include <string.h>
#include <zlib.h>

int nimbus_inflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len) {
    z_stream s;
    memset(&s, 0, sizeof(s));
    if (inflateInit2(&s, -15) != Z_OK) return -1;
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_len;
    int rc = inflate(&s, Z_FINISH);
    size_t produced = out_len - s.avail_out;
    inflateEnd(&s);
    // qcow2 rounds compressed data up to sectors, so trailing bytes after the stream are normal.
    if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && produced == out_len) return 0;
    return -1;
}

size_t nimbus_deflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap) {
    z_stream s;
    memset(&s, 0, sizeof(s));
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) return 0;
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_cap;
    int rc = deflate(&s, Z_FINISH);
    size_t produced = out_cap - s.avail_out;
    deflateEnd(&s);
    return rc == Z_STREAM_END ? produced : 0;
}
