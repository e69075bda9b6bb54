/* pause: the sandbox ("infra") process of every pod on the local cluster's
 * real node (hack/cluster.sh). It holds the pod's namespaces open, reaps
 * children re-parented to it, and exits 0 on SIGINT/SIGTERM. Built static
 * into an image FROM scratch, since no registry is reachable. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa = {0};
    sigset_t none;

    if (getpid() != 1) fprintf(stderr, "pause: warning: not pid 1\n");
    sa.sa_handler = on_stop;
    if (sigaction(SIGINT, &sa, NULL) || sigaction(SIGTERM, &sa, NULL)) return 1;
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &sa, NULL)) return 1;
    sigemptyset(&none);
    for (;;) sigsuspend(&none);
}
