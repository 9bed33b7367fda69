/* The cache slots of a decode step, from the sequences' block tables.
 *
 * Every sequence decodes its last token: the one-call decoder (cpu_decoder.c) reads each sequence's context
 * through the flat slot list and writes the new token's K/V to the last slot. Built with torch from Python
 * lists this took a dozen tensor ops a step (ModelRunner._decode_slots_torch, kept where the library is not);
 * here it is one pass over the slots.
 */
#include "quant_cpu.h"

/* For S sequences of context lengths lens[s] whose block ids lie one table after another in blocks (sequence s
 * holds ceil(lens[s] / bs) of them, in position order):
 *   flat[starts[s] + t] = blocks[b0(s) + t / bs] * bs + t % bs   every context position t < lens[s]
 *   starts[s] = lens[0] + ... + lens[s - 1], starts[S] = the total
 *   last[s] = the slot of position lens[s] - 1 (where the new token's K/V goes), pos[s] = lens[s] - 1 */
void decode_slots(const int64_t *blocks, const int64_t *lens, int64_t S, int64_t bs, int64_t *flat, int64_t *starts,
                  int64_t *last, int64_t *pos) {
    int64_t at = 0, b0 = 0;
    for (int64_t s = 0; s < S; s++) {
        const int64_t n = lens[s], nb = (n + bs - 1) / bs;
        starts[s] = at;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t base = blocks[b0 + b] * bs, m = n - b * bs < bs ? n - b * bs : bs;
            for (int64_t j = 0; j < m; j++) flat[at++] = base + j;
        }
        last[s] = flat[at - 1];
        pos[s] = n - 1;
        b0 += nb;
    }
    starts[S] = at;
}
