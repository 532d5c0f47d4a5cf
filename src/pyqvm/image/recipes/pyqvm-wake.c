/*
 * pyqvm-wake -d PORT: make a fresh clone of a template its own, on request
 * of the host through a virtio-serial port.
 *
 * Sets the clock to the host's time (nanoseconds since the epoch, sent with
 * the request), mixes the entropy bytes (the host's) into the kernel's pool,
 * credited, and reseeds the CRNG from it at once.
 *
 * A clone wakes up with the template's clock and CRNG key. Writing to
 * /dev/urandom only feeds the input pool, which Linux 6.1 draws from at its
 * next scheduled reseed (up to 60 s later); RNDRESEEDCRNG makes the fresh
 * entropy the key now, so two clones never read the same bytes.
 *
 * The daemon is started by the guest's hotplug helper when its port
 * (org.pyqvm.wake.0) appears, so it is already waiting in the template: a
 * clone is woken by one line from the host, with no fork or exec in the
 * guest (under TCG an exec through the agent costs ~0.1 s in a fresh clone,
 * most of a clone's start). Request: "NANOSECONDS HEX\n"; reply: "ok\n" or
 * "error: WHAT\n". It exits when the host's end goes away (read returns 0).
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
#define MAX_LINE (32 + 2 * MAX_BYTES)

static char errbuf[128];

static const char *failed(const char *what)
{
	snprintf(errbuf, sizeof(errbuf), "%s: %s", what, strerror(errno));
	return errbuf;
}

/* Set the clock and reseed; NULL, or what failed. */
static const char *wake(unsigned long long ns, const unsigned char *bytes, size_t len)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_BYTES];
	} req;
	struct timespec now;
	const char *err = NULL;
	int fd;

	if (len < 32 || len > MAX_BYTES)
		return "need 32 to 512 bytes of entropy";
	now.tv_sec = (time_t)(ns / 1000000000ULL);
	now.tv_nsec = (long)(ns % 1000000000ULL);
	if (clock_settime(CLOCK_REALTIME, &now) < 0)
		return failed("clock_settime");
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return failed("/dev/urandom");
	memcpy(req.buf, bytes, len);
	req.info.entropy_count = (int)(len * 8);
	req.info.buf_size = (int)len;
	if (ioctl(fd, RNDADDENTROPY, &req) < 0)
		err = failed("RNDADDENTROPY");
	else if (ioctl(fd, RNDRESEEDCRNG) < 0)
		err = failed("RNDRESEEDCRNG");
	explicit_bzero(req.buf, sizeof(req.buf));
	close(fd);
	return err;
}

static int parse_time(const char *s, unsigned long long *ns)
{
	char *end;

	errno = 0;
	*ns = strtoull(s, &end, 10);
	return !(errno || end == s || (*end && *end != ' '));
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* One request line: "NANOSECONDS HEX"; NULL, or what was wrong. */
static const char *serve(char *line)
{
	unsigned char bytes[MAX_BYTES];
	unsigned long long ns;
	char *hex = strchr(line, ' ');
	size_t i, len;
	const char *err;

	if (!hex || !parse_time(line, &ns))
		return "bad request (want: NANOSECONDS HEX)";
	hex++;
	len = strlen(hex) / 2;
	if (strlen(hex) % 2 || len > MAX_BYTES)
		return "bad entropy hex";
	for (i = 0; i < len; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return "bad entropy hex";
		bytes[i] = (unsigned char)(hi << 4 | lo);
	}
	err = wake(ns, bytes, len);
	explicit_bzero(bytes, sizeof(bytes));
	explicit_bzero(line, strlen(line));
	return err;
}

static int daemon_loop(const char *port)
{
	char line[MAX_LINE + 2], reply[sizeof(errbuf) + 16];
	size_t used = 0;
	ssize_t n;
	int fd = open(port, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		fprintf(stderr, "pyqvm-wake: %s\n", failed(port));
		return 1;
	}
	for (;;) {
		char *nl;

		n = read(fd, line + used, MAX_LINE + 1 - used);
		if (n == 0)
			return 0; /* the host's end is gone */
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "pyqvm-wake: %s\n", failed("read"));
			return 1;
		}
		used += (size_t)n;
		line[used] = '\0';
		while ((nl = memchr(line, '\n', used)) != NULL) {
			const char *err;
			size_t rest;

			*nl = '\0';
			err = serve(line);
			if (err)
				snprintf(reply, sizeof(reply), "error: %s\n", err);
			else
				strcpy(reply, "ok\n");
			if (write(fd, reply, strlen(reply)) < 0)
				fprintf(stderr, "pyqvm-wake: %s\n", failed("write"));
			rest = used - (size_t)(nl + 1 - line);
			memmove(line, nl + 1, rest);
			used = rest;
			line[used] = '\0';
		}
		if (used > MAX_LINE) { /* no newline in a line's worth: drop it */
			const char *msg = "error: request too long\n";
			if (write(fd, msg, strlen(msg)) < 0)
				fprintf(stderr, "pyqvm-wake: %s\n", failed("write"));
			used = 0;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc != 3 || strcmp(argv[1], "-d") != 0) {
		fprintf(stderr, "usage: pyqvm-wake -d PORT\n");
		return 2;
	}
	return daemon_loop(argv[2]);
}
