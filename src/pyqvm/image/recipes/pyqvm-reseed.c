/*
 * pyqvm-reseed: mix the bytes on stdin into the kernel's entropy pool,
 * credited, then reseed the CRNG from it at once.
 *
 * A clone of a template wakes up with the template's CRNG key. Writing to
 * /dev/urandom only feeds the input pool, which Linux 6.1 draws from at its
 * next scheduled reseed (up to 60 s later); RNDRESEEDCRNG makes the fresh
 * host entropy the key now, so two clones never read the same bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_BYTES 512

int main(void)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_BYTES];
	} req;
	size_t len = 0;
	ssize_t n;
	int fd;

	while (len < MAX_BYTES && (n = read(0, req.buf + len, MAX_BYTES - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("pyqvm-reseed: stdin");
			return 1;
		}
		len += (size_t)n;
	}
	if (len < 32) {
		fprintf(stderr, "pyqvm-reseed: need at least 32 bytes on stdin, got %zu\n", len);
		return 2;
	}
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		perror("pyqvm-reseed: /dev/urandom");
		return 1;
	}
	req.info.entropy_count = (int)(len * 8);
	req.info.buf_size = (int)len;
	if (ioctl(fd, RNDADDENTROPY, &req) < 0) {
		perror("pyqvm-reseed: RNDADDENTROPY");
		return 1;
	}
	if (ioctl(fd, RNDRESEEDCRNG) < 0) {
		perror("pyqvm-reseed: RNDRESEEDCRNG");
		return 1;
	}
	explicit_bzero(req.buf, sizeof(req.buf));
	return 0;
}
