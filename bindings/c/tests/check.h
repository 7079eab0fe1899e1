/* Assertion helpers shared by the C tests: each failure prints the line, the status and the
 * library's last error message, and exits non-zero. */
#ifndef EDGETUNE_TEST_CHECK_H
#define EDGETUNE_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgetune.h"

static inline const char *last_error(void) {
    static char buf[2048];
    edgetune_last_error_message(buf, sizeof buf);
    return buf;
}

/* A call that must succeed. */
#define OK(call)                                                                              \
    do {                                                                                      \
        edgetune_status s_ = (call);                                                          \
        if (s_ != EDGETUNE_OK) {                                                              \
            fprintf(stderr, "%s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #call, (int)s_, \
                    last_error());                                                            \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* A call that must fail with `want`, and a message that contains `needle`. */
#define FAILS(call, want, needle)                                                             \
    do {                                                                                      \
        edgetune_status s_ = (call);                                                          \
        if (s_ != (want) || strstr(last_error(), (needle)) == NULL) {                         \
            fprintf(stderr, "%s:%d: %s returned %d (want %d) with \"%s\" (want \"%s\")\n",   \
                    __FILE__, __LINE__, #call, (int)s_, (int)(want), last_error(), (needle)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#endif
