/* libFuzzer target: the reply parsing of nsd's native client (nsd_parse_enter, and
 * nsd_parse_reply under it), on any bytes. The first byte picks how many descriptors
 * "came with" the reply, so the namespaceFileDescriptor bounds are exercised too.
 * Run by `make fuzz-run` (scripts/test) on the committed corpus in fuzz/corpus/. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../lib/nsd_client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    size_t nfds = data[0] % (NSD_MAX_FDS + 1);
    struct nsd_grant grant;
    struct nsd_error err;
    enum nsd_result r = nsd_parse_enter((const char *)data + 1, size - 1, nfds, &grant, &err);
    if (r == NSD_OK && grant.ns_index >= nfds)
        __builtin_trap(); /* the parser promised an index among the descriptors */
    if (r != NSD_OK && memchr(err.message, '\0', sizeof err.message) == NULL)
        __builtin_trap(); /* every message is a terminated string */
    return 0;
}
