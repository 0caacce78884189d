/*
 * provisioner's pod sandbox ("pause") program: PID 1 of every pod's infra container, the image
 * provisioner.local/pause:1 that provisioner/images/oci.py builds and containerd's CRI plugin
 * starts for each pod (sandbox_image in the k8s image's /etc/containerd/config.toml).
 *
 * It only holds the pod's namespaces open. It sleeps until SIGTERM or SIGINT, then exits 0 (the
 * runtime stops a sandbox with SIGTERM), and it reaps every child that ends: in a pod that shares
 * its PID namespace, orphaned processes are re-parented to it and would stay zombies otherwise.
 *
 * Why C: Debian's gcc and libc6-dev make a static binary of well under 1 MB with nothing else to
 * install on the build host (`gcc -static -Os -s`); a Go one would need a Go toolchain on every
 * image-building machine and be larger. Written for provisioner, not taken from elsewhere.
 *
 * How: SIGTERM, SIGINT and SIGCHLD stay blocked and are taken one at a time with sigwaitinfo(),
 * so no handler ever runs. A blocked signal is queued even for a PID 1 with the default
 * disposition (which the kernel would otherwise drop for a namespace's init).
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

static void reap(void)
{
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(int argc, char **argv)
{
	sigset_t wanted;

	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		puts("provisioner-pause 1");
		return 0;
	}
	sigemptyset(&wanted);
	sigaddset(&wanted, SIGTERM);
	sigaddset(&wanted, SIGINT);
	sigaddset(&wanted, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &wanted, NULL) != 0) {
		perror("pause: sigprocmask");
		return 1;
	}
	for (;;) {
		/* children that ended before SIGCHLD was blocked, then each new SIGCHLD */
		reap();
		int sig = sigwaitinfo(&wanted, NULL);
		if (sig == SIGTERM || sig == SIGINT)
			return 0;
		/* SIGCHLD: reap at the top of the loop; -1 (EINTR after a stop/continue): wait again */
	}
}
