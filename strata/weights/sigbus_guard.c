/* SIGBUS on a mapped model file: one line naming the file on stderr, then _exit with a distinct code.
 *
 * A weight that is a view of a file mapping faults with SIGBUS when the file is truncated under the process.
 * Python cannot handle that signal (the faulting instruction would run again), so this handler, installed
 * by strata/weights/file_guard.py, finds the file whose mapping holds the faulting address among the
 * registered ranges and writes its prepared message with write(2), the async-signal-safe way. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_RANGES 1024

static uintptr_t range_lo[MAX_RANGES], range_hi[MAX_RANGES];
static char *range_msg[MAX_RANGES];
static int num_ranges;
static char *fallback_msg;
static int exit_code = 75;

int strata_sigbus_add_range(uintptr_t lo, uintptr_t hi, const char *msg) {
    if (num_ranges >= MAX_RANGES) return -1;
    range_msg[num_ranges] = strdup(msg);
    range_lo[num_ranges] = lo;
    range_hi[num_ranges] = hi;
    num_ranges++;
    return 0;
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    (void)sig;
    (void)ctx;
    uintptr_t addr = (uintptr_t)info->si_addr;
    const char *msg = fallback_msg;
    for (int i = 0; i < num_ranges; i++)
        if (range_lo[i] <= addr && addr < range_hi[i]) msg = range_msg[i];
    if (msg) {
        ssize_t r = write(2, msg, strlen(msg));
        (void)r;
    }
    _exit(exit_code);
}

int strata_sigbus_install(const char *msg, int code) {
    fallback_msg = strdup(msg);
    exit_code = code;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL);
}
