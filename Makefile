# manhole: `make` builds the library and the demo; `make test` runs the
# whole suite; `make demo` builds and starts the demo.
#
# Other targets: check-asan (suite against an AddressSanitizer +
# UndefinedBehaviorSanitizer build), check-valgrind, check-portable (Linux
# fast paths off), check-warnings (gcc and clang, -Werror), fuzz, soak,
# clean.

PYTHON_PC ?= python3-embed
# Recursive on purpose: evaluated after `deps` may have installed them.
PY_CFLAGS = $(shell pkg-config --cflags $(PYTHON_PC))
PY_LIBS = $(shell pkg-config --libs $(PYTHON_PC))
# The interpreter matching the embedded CPython (not whatever python3 is
# first on PATH), so Debian's python3-pytest is found.
PYTHON ?= $(shell pkg-config --variable=exec_prefix $(PYTHON_PC) 2>/dev/null || echo /usr)/bin/python$(shell pkg-config --modversion $(PYTHON_PC) 2>/dev/null || echo 3)

CC ?= cc
AR ?= ar
LD ?= ld
OBJCOPY ?= objcopy
OPTIMIZATION ?= -O2
DEBUG ?= -g
WARNINGS = -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes -Wwrite-strings
# Extra flags for variant builds (sanitizers, -DMANHOLE_PORTABLE, -Werror).
VARIANT_CFLAGS ?=
VARIANT_LDFLAGS ?=
REAL_CFLAGS = -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) -fPIC -fvisibility=hidden \
              $(PY_CFLAGS) $(VARIANT_CFLAGS) $(CPPFLAGS) $(CFLAGS)
REAL_LDFLAGS = $(VARIANT_LDFLAGS) $(LDFLAGS)
LIBS = $(PY_LIBS) -lpthread

VERSION := $(shell sed -n 's/^\#define MANHOLE_VERSION_STRING "\(.*\)"/\1/p' manhole.h)
MAJOR := $(shell sed -n 's/^\#define MANHOLE_VERSION_MAJOR \([0-9]*\)/\1/p' manhole.h)
SONAME = libmanhole.so.$(MAJOR)

# Installation (make install PREFIX=... DESTDIR=...).
PREFIX ?= /usr/local
INCLUDEDIR ?= $(PREFIX)/include
LIBDIR ?= $(PREFIX)/lib
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig

# Build directory: `.` for the normal build, build/<variant> for the others.
B ?= .
HOSTS = $(B)/tests/hosts/test-host $(B)/tests/hosts/api-test $(B)/tests/hosts/wire-test
EXAMPLES = $(B)/examples/select-host $(B)/examples/poll-host $(B)/examples/libevent-host \
           $(B)/examples/libuv-host
PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider
TESTS ?= tests

.PHONY: FORCE default all cli check-pythons demo test deps clean hosts check check-asan check-valgrind \
        check-portable check-warnings fuzz soak bench bench-bins install uninstall examples \
        examples-bins

# `make` on a fresh machine first installs what building needs (deps).
default: deps
	$(MAKE) all

all: $(B)/libmanhole.a $(B)/libmanhole.so $(B)/demo/manhole-demo $(B)/cli/manhole-cli

# The library's sources: manhole.c (the core) and the files behind its
# private headers. Their own symbols are hidden: in the .so by visibility,
# in the .a by linking them into one object whose hidden symbols are made
# local, so a program linking libmanhole.a sees only manhole_* names.
LIB_SRCS = manhole.c wire.c
LIB_HDRS = manhole.h wire.h
LIB_OBJS = $(LIB_SRCS:%.c=$(B)/obj/%.o)

$(B)/obj/%.o: %.c $(LIB_HDRS)
	@mkdir -p $(B)/obj
	$(CC) $(REAL_CFLAGS) -c $< -o $@

$(B)/manhole.o: $(LIB_OBJS)
	$(LD) -r -o $@ $(LIB_OBJS)
	$(OBJCOPY) --localize-hidden $@

$(B)/libmanhole.a: $(B)/manhole.o
	rm -f $@
	$(AR) rcs $@ $(B)/manhole.o

$(B)/libmanhole.so.$(VERSION): $(B)/manhole.o
	$(CC) -shared -Wl,-soname,$(SONAME) $(REAL_LDFLAGS) -o $@ $(B)/manhole.o $(LIBS)

$(B)/libmanhole.so: $(B)/libmanhole.so.$(VERSION)
	ln -sf libmanhole.so.$(VERSION) $(B)/$(SONAME)
	ln -sf libmanhole.so.$(VERSION) $@

$(B)/demo/manhole-demo: demo/manhole-demo.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/demo
	$(CC) $(REAL_CFLAGS) $(REAL_LDFLAGS) -o $@ demo/manhole-demo.c $(B)/libmanhole.a $(LIBS)

$(B)/tests/hosts/%: tests/hosts/%.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/tests/hosts
	$(CC) $(REAL_CFLAGS) $(REAL_LDFLAGS) -o $@ $< $(B)/libmanhole.a $(LIBS)

# wire.c on its own (its symbols are hidden in the library).
$(B)/tests/hosts/wire-test: tests/hosts/wire-test.c wire.c wire.h
	@mkdir -p $(B)/tests/hosts
	$(CC) -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) $(VARIANT_CFLAGS) $(CFLAGS) \
	      $(REAL_LDFLAGS) -o $@ tests/hosts/wire-test.c wire.c

hosts: $(HOSTS)

# The client (cli/): libc and libedit only, no Python.
EDIT_CFLAGS = $(shell pkg-config --cflags libedit 2>/dev/null)
EDIT_LIBS = $(shell pkg-config --libs libedit 2>/dev/null || echo -ledit)
$(B)/cli/manhole-cli: cli/manhole-cli.c manhole.h wire.c wire.h
	@mkdir -p $(B)/cli
	$(CC) -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) -I. $(EDIT_CFLAGS) $(VARIANT_CFLAGS) \
	      $(CFLAGS) $(REAL_LDFLAGS) -o $@ cli/manhole-cli.c wire.c $(EDIT_LIBS)
cli: $(B)/cli/manhole-cli

# Examples build as a user's program would: against the header and the
# library, with -I. standing in for the installed include directory.
EXAMPLE_CFLAGS = -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) -I. $(VARIANT_CFLAGS) $(CFLAGS)
$(B)/examples/select-host $(B)/examples/poll-host: $(B)/examples/%: examples/%.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/examples
	$(CC) $(EXAMPLE_CFLAGS) $(REAL_LDFLAGS) -o $@ $< $(B)/libmanhole.a $(LIBS)
$(B)/examples/libevent-host: examples/libevent-host.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/examples
	$(CC) $(EXAMPLE_CFLAGS) $$(pkg-config --cflags libevent) $(REAL_LDFLAGS) -o $@ $< \
	      $(B)/libmanhole.a $$(pkg-config --libs libevent) $(LIBS)
$(B)/examples/libuv-host: examples/libuv-host.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/examples
	$(CC) $(EXAMPLE_CFLAGS) $$(pkg-config --cflags libuv) $(REAL_LDFLAGS) -o $@ $< \
	      $(B)/libmanhole.a $$(pkg-config --libs libuv) $(LIBS)

# (deps: libevent-dev and libuv1-dev are not on a fresh machine)
examples: deps
	$(MAKE) $(EXAMPLES)
examples-bins: $(EXAMPLES)

# The version, the soname and the .pc all come from manhole.h (the man
# pages carry the version too, as written: tests/test_docs.py checks them).
# The .pc is written anew every time: it records PREFIX, which may differ
# per call. Its Libs carry an rpath to LIBDIR, so a program built with
# `pkg-config --libs manhole` finds libmanhole.so at run time wherever it
# was installed (a custom PREFIX, or /usr/local/lib before ldconfig ran);
# PC_RPATH= (empty) leaves it out, as distribution packages want.
PC_RPATH ?= -Wl,-rpath,$${libdir}
$(B)/manhole.pc: FORCE
	@mkdir -p $(B)
	@printf '%s\n' '# License: BSD-2-Clause (see LICENSE)' 'prefix=$(PREFIX)' 'includedir=$(INCLUDEDIR)' 'libdir=$(LIBDIR)' '' \
	  'Name: manhole' \
	  'Description: A Python REPL inside a running C program' \
	  'Version: $(VERSION)' \
	  'Requires.private: $(PYTHON_PC)' \
	  'Libs: -L$${libdir} $(PC_RPATH) -lmanhole' \
	  'Libs.private: -lpthread' \
	  'Cflags: -I$${includedir}' > $@

# `man manhole_open` (and every public call, and the config type) finds
# manhole(3): one .so stub per name declared in manhole.h.
LPAREN := (
MAN3_ALIASES = $(shell sed -n 's/^MANHOLE_API.*[ *]\(manhole_[a-z_]*\)[$(LPAREN)].*/\1/p' manhole.h | sort -u) \
               manhole_config manhole_value manhole_fn manhole_log_fn

install: all $(B)/manhole.pc
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR) \
	           $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man3
	install -m 644 manhole.h $(DESTDIR)$(INCLUDEDIR)/manhole.h
	install -m 644 $(B)/libmanhole.a $(DESTDIR)$(LIBDIR)/libmanhole.a
	install -m 755 $(B)/libmanhole.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libmanhole.so.$(VERSION)
	ln -sf libmanhole.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libmanhole.so
	install -m 644 $(B)/manhole.pc $(DESTDIR)$(PKGCONFIGDIR)/manhole.pc
	install -m 755 $(B)/demo/manhole-demo $(DESTDIR)$(BINDIR)/manhole-demo
	install -m 755 $(B)/cli/manhole-cli $(DESTDIR)$(BINDIR)/manhole-cli
	install -m 644 man/manhole.3 $(DESTDIR)$(MANDIR)/man3/manhole.3
	install -m 644 man/manhole-demo.1 man/manhole-cli.1 $(DESTDIR)$(MANDIR)/man1/
	for f in $(MAN3_ALIASES); do \
	    echo '.so man3/manhole.3' > $(DESTDIR)$(MANDIR)/man3/$$f.3; \
	    chmod 644 $(DESTDIR)$(MANDIR)/man3/$$f.3; done

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/manhole.h $(DESTDIR)$(LIBDIR)/libmanhole.a \
	      $(DESTDIR)$(LIBDIR)/libmanhole.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME) \
	      $(DESTDIR)$(LIBDIR)/libmanhole.so $(DESTDIR)$(PKGCONFIGDIR)/manhole.pc \
	      $(DESTDIR)$(BINDIR)/manhole-demo $(DESTDIR)$(MANDIR)/man3/manhole.3 \
	      $(DESTDIR)$(MANDIR)/man1/manhole-demo.1 $(DESTDIR)$(BINDIR)/manhole-cli \
	      $(DESTDIR)$(MANDIR)/man1/manhole-cli.1
	for f in $(MAN3_ALIASES); do rm -f $(DESTDIR)$(MANDIR)/man3/$$f.3; done

deps:
	@PYTHON=$(PYTHON) ./tools/ensure-deps

demo: deps
	$(MAKE) all
	./demo/manhole-demo

test: deps
	$(MAKE) all hosts $(EXAMPLES)
	$(PYTEST) $(TESTS)

check: test

# ---- Variant builds, each run against the whole suite -----------------

SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
check-asan: deps
	$(MAKE) B=build/asan OPTIMIZATION=-O1 VARIANT_CFLAGS="$(SAN_FLAGS)" \
	        VARIANT_LDFLAGS="$(SAN_FLAGS)" all hosts examples-bins
	MANHOLE_BUILD_DIR=build/asan MANHOLE_TEST_SANITIZER=1 MANHOLE_TEST_CFLAGS="$(SAN_FLAGS)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	PYTHONMALLOC=malloc $(PYTEST) $(TESTS)

check-valgrind: deps
	$(MAKE) B=build/valgrind OPTIMIZATION=-O1 all hosts examples-bins
	MANHOLE_BUILD_DIR=build/valgrind MANHOLE_TEST_TIMEOUT=120 PYTHONMALLOC=malloc \
	MANHOLE_TEST_WRAP="valgrind -q --error-exitcode=99 --leak-check=full \
	  --show-leak-kinds=definite --errors-for-leak-kinds=definite --suppressions=$(CURDIR)/tests/valgrind.supp" \
	$(PYTEST) $(TESTS)

check-portable: deps
	$(MAKE) B=build/portable VARIANT_CFLAGS=-DMANHOLE_PORTABLE all hosts examples-bins
	MANHOLE_BUILD_DIR=build/portable MANHOLE_TEST_PORTABLE=1 $(PYTEST) $(TESTS)

check-warnings: deps
	$(MAKE) B=build/gcc CC=gcc VARIANT_CFLAGS=-Werror all hosts examples-bins bench-bins
	$(MAKE) B=build/clang CC=clang VARIANT_CFLAGS=-Werror all hosts examples-bins bench-bins
	$(MAKE) B=build/clang-portable CC=clang VARIANT_CFLAGS="-Werror -DMANHOLE_PORTABLE" \
	        all hosts examples-bins

# Every CPython found (Debian's python3-embed and each pyenv version with an
# embed .pc; PYTHONS="3.8 3.12 ..." picks some), each in build/py-<version>,
# the whole suite against each with that version's interpreter as the oracle.
check-pythons: deps
	PYTHON=$(PYTHON) ./tools/check-pythons $(PYTHONS)

# ---- Fuzzing and soaking -------------------------------------------------

FUZZ_TIME ?= 60
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
build/fuzz/fuzz_framing: tests/fuzz/fuzz_framing.c $(LIB_SRCS) $(LIB_HDRS)
	@mkdir -p build/fuzz/corpus
	clang $(FUZZ_FLAGS) -std=c11 -Wno-unused-function $(PY_CFLAGS) -o $@ \
	      tests/fuzz/fuzz_framing.c wire.c $(PY_LIBS) -lpthread

# A bounded session; the corpus grows in build/fuzz/corpus.
fuzz: deps
	$(MAKE) build/fuzz/fuzz_framing
	ASAN_OPTIONS=detect_leaks=0 build/fuzz/fuzz_framing -max_total_time=$(FUZZ_TIME) \
	      -artifact_prefix=build/fuzz/ \
	      -max_len=4096 -print_final_stats=1 build/fuzz/corpus tests/fuzz/seeds

# ---- The benchmark (README, Performance) ---------------------------------

BENCH = $(B)/bench/bench $(B)/bench/bench-host $(B)/bench/floor
$(B)/bench/bench: bench/bench.c
	@mkdir -p $(B)/bench
	$(CC) -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) $(VARIANT_CFLAGS) $(CFLAGS) -o $@ \
	      bench/bench.c -lpthread
$(B)/bench/bench-host: bench/bench-host.c manhole.h $(B)/libmanhole.a
	@mkdir -p $(B)/bench
	$(CC) $(REAL_CFLAGS) $(REAL_LDFLAGS) -o $@ bench/bench-host.c $(B)/libmanhole.a $(LIBS)
$(B)/bench/floor: bench/floor.c $(LIB_SRCS) $(LIB_HDRS)
	@mkdir -p $(B)/bench
	$(CC) $(REAL_CFLAGS) -Wno-unused-function $(REAL_LDFLAGS) -o $@ bench/floor.c wire.c $(LIBS)

bench-bins: $(BENCH)

bench: deps
	$(MAKE) all $(BENCH)
	$(B)/bench/bench $(BENCH_ARGS)

SOAK_SECONDS ?= 60
SOAK_CLIENTS ?= 32
soak: deps
	$(MAKE) all hosts
	$(PYTHON) tests/soak.py --seconds $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)

clean:
	rm -rf obj
	rm -f *.o *.a libmanhole.so* manhole.pc demo/manhole-demo tests/hosts/test-host tests/hosts/api-test bench/bench \
	      bench/bench-host bench/floor $(EXAMPLES)
	rm -rf build tests/__pycache__ .pytest_cache
