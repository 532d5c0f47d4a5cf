/*
 * pyqvm-wake NANOSECONDS: make a fresh clone of a template its own.
 *
 * Sets the clock to NANOSECONDS since the epoch (the host's time, sent with
 * the call), mixes the bytes on stdin (host entropy) into the kernel's pool,
 * credited, and reseeds the CRNG from it at once.
 *
 * A clone wakes up with the template's clock and CRNG key. Writing to
 * /dev/urandom only feeds the input pool, which Linux 6.1 draws from at its
 * next scheduled reseed (up to 60 s later); RNDRESEEDCRNG makes the fresh
 * entropy the key now, so two clones never read the same bytes. One static
 * program does both in one exec: the agent's guest-set-time forks hwclock
 * as well, and a dynamic one spends most of its time in the loader (TCG).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_BYTES 512

static int fail(const char *what)
{
	fprintf(stderr, "pyqvm-wake: %s: %s\n", what, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_BYTES];
	} req;
	struct timespec now;
	unsigned long long ns;
	char *end;
	size_t len = 0;
	ssize_t n;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: pyqvm-wake NANOSECONDS < ENTROPY\n");
		return 2;
	}
	errno = 0;
	ns = strtoull(argv[1], &end, 10);
	if (errno || *end || end == argv[1]) {
		fprintf(stderr, "pyqvm-wake: bad time %s\n", argv[1]);
		return 2;
	}
	now.tv_sec = (time_t)(ns / 1000000000ULL);
	now.tv_nsec = (long)(ns % 1000000000ULL);
	if (clock_settime(CLOCK_REALTIME, &now) < 0)
		return fail("clock_settime");

	while (len < MAX_BYTES && (n = read(0, req.buf + len, MAX_BYTES - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("stdin");
		}
		len += (size_t)n;
	}
	if (len < 32) {
		fprintf(stderr, "pyqvm-wake: need at least 32 bytes on stdin, got %zu\n", len);
		return 2;
	}
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return fail("/dev/urandom");
	req.info.entropy_count = (int)(len * 8);
	req.info.buf_size = (int)len;
	if (ioctl(fd, RNDADDENTROPY, &req) < 0)
		return fail("RNDADDENTROPY");
	if (ioctl(fd, RNDRESEEDCRNG) < 0)
		return fail("RNDRESEEDCRNG");
	explicit_bzero(req.buf, sizeof(req.buf));
	return 0;
}
