# manhole: `make` builds the library and the demo; `make test` runs the
# whole suite; `make demo` builds and starts the demo.

PYTHON_PC ?= python3-embed
# Recursive on purpose: evaluated after `deps` may have installed them.
PY_CFLAGS = $(shell pkg-config --cflags $(PYTHON_PC))
PY_LIBS = $(shell pkg-config --libs $(PYTHON_PC))
# The interpreter matching the embedded CPython (not whatever python3 is
# first on PATH), so Debian's python3-pytest is found.
PYTHON ?= $(shell pkg-config --variable=exec_prefix $(PYTHON_PC) 2>/dev/null || echo /usr)/bin/python$(shell pkg-config --modversion $(PYTHON_PC) 2>/dev/null || echo 3)

CC ?= cc
AR ?= ar
OPTIMIZATION ?= -O2
DEBUG ?= -g
WARNINGS = -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes -Wwrite-strings
REAL_CFLAGS = -std=c11 $(OPTIMIZATION) $(DEBUG) $(WARNINGS) -fPIC -fvisibility=hidden \
              $(PY_CFLAGS) $(CPPFLAGS) $(CFLAGS)
REAL_LDFLAGS = $(LDFLAGS)
LIBS = $(PY_LIBS) -lpthread

VERSION := $(shell sed -n 's/^\#define MANHOLE_VERSION_STRING "\(.*\)"/\1/p' manhole.h)
MAJOR := $(shell sed -n 's/^\#define MANHOLE_VERSION_MAJOR \([0-9]*\)/\1/p' manhole.h)
SONAME = libmanhole.so.$(MAJOR)

HOSTS = tests/hosts/test-host

.PHONY: all demo test deps clean hosts

all: libmanhole.a libmanhole.so demo/manhole-demo

manhole.o: manhole.c manhole.h
	$(CC) $(REAL_CFLAGS) -c manhole.c -o $@

libmanhole.a: manhole.o
	$(AR) rcs $@ manhole.o

libmanhole.so.$(VERSION): manhole.o
	$(CC) -shared -Wl,-soname,$(SONAME) $(REAL_LDFLAGS) -o $@ manhole.o $(LIBS)

libmanhole.so: libmanhole.so.$(VERSION)
	ln -sf libmanhole.so.$(VERSION) $(SONAME)
	ln -sf libmanhole.so.$(VERSION) $@

demo/manhole-demo: demo/manhole-demo.c manhole.h libmanhole.a
	$(CC) $(REAL_CFLAGS) $(REAL_LDFLAGS) -o $@ demo/manhole-demo.c libmanhole.a $(LIBS)

tests/hosts/%: tests/hosts/%.c manhole.h libmanhole.a
	$(CC) $(REAL_CFLAGS) $(REAL_LDFLAGS) -o $@ $< libmanhole.a $(LIBS)

hosts: $(HOSTS)

deps:
	@PYTHON=$(PYTHON) ./tools/ensure-deps

demo: all
	./demo/manhole-demo

test: deps
	$(MAKE) all hosts
	$(PYTHON) -m pytest -q tests

clean:
	rm -f *.o *.a libmanhole.so* demo/manhole-demo $(HOSTS)
	rm -rf tests/__pycache__ .pytest_cache
