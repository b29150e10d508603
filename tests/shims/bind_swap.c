/*
 * bind_swap: an LD_PRELOAD shim that makes a path race deterministic.
 *
 * As soon as a socket file appears under a name directly inside the
 * directory BIND_SWAP_DIR (a bind() of an AF_UNIX socket to that name, or
 * a rename() of something onto it), the shim replaces it with a symlink
 * to BIND_SWAP_TARGET, as another user with write access to that
 * directory could do at that very moment. Whatever the host then does to
 * the name (chmod, chown, ...) reaches the target if it follows the link.
 * Names in other directories (a private one beside it, say) and every
 * other call pass through untouched. One line on stderr tells that the
 * swap happened, so a test knows it was not vacuous.
 *
 * Build: cc -shared -fPIC -o bind_swap.so bind_swap.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* Is path a name directly inside dir? */
static int in_dir(const char *path, const char *dir)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    return strncmp(path, dir, n) == 0 && path[n] == '/' && path[n + 1] &&
           !strchr(path + n + 1, '/');
}

/* A socket just appeared at path: swap it for the symlink if it is ours
 * to swap. errno is kept. */
static void swap(const char *path)
{
    const char *dir = getenv("BIND_SWAP_DIR");
    const char *target = getenv("BIND_SWAP_TARGET");
    struct stat st;
    if (!dir || !target || !in_dir(path, dir) || lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode))
        return;
    int saved = errno;
    if (unlink(path) == 0 && symlink(target, path) == 0) {
        static const char msg[] = "bind_swap: socket path replaced by a symlink\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
    }
    errno = saved;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    int (*real)(int, const struct sockaddr *, socklen_t) =
        (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    int r = real(fd, addr, len);
    size_t off = offsetof(struct sockaddr_un, sun_path);
    if (r == 0 && addr && addr->sa_family == AF_UNIX && len > (socklen_t)off) {
        char path[sizeof ((struct sockaddr_un *)0)->sun_path + 1];
        size_t n = (size_t)len - off;
        if (n > sizeof path - 1)
            n = sizeof path - 1;
        memcpy(path, ((const struct sockaddr_un *)addr)->sun_path, n);
        path[n] = 0;
        if (path[0])
            swap(path);
    }
    return r;
}

int rename(const char *from, const char *to)
{
    int (*real)(const char *, const char *) =
        (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    int r = real(from, to);
    if (r == 0 && to[0] == '/')
        swap(to);
    return r;
}

int renameat(int fromfd, const char *from, int tofd, const char *to)
{
    int (*real)(int, const char *, int, const char *) =
        (int (*)(int, const char *, int, const char *))dlsym(RTLD_NEXT, "renameat");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    int r = real(fromfd, from, tofd, to);
    if (r == 0 && to[0] == '/')
        swap(to);
    return r;
}
