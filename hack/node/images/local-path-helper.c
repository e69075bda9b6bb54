/* local-path-helper: the setup/teardown command of the local-path volume
 * provisioner's helper pods on the local cluster's real node (hack/cluster.sh;
 * setupCommand/teardownCommand in its config), instead of a shell script in a
 * busybox image. Called as
 *   local-path-helper -p <volume dir> -s <size bytes> -m <mode> -a create|delete
 * create: mkdir -p <volume dir>, mode 0777; delete: remove it recursively. */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int mkdir_p(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(path, 0777) && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(path, 0777) && errno != EEXIST) return -1;
    return chmod(path, 0777);
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

int main(int argc, char **argv) {
    char *path = NULL, *action = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-p")) path = argv[i + 1];
        else if (!strcmp(argv[i], "-a")) action = argv[i + 1];
    }
    if (!path || !action || path[0] != '/' || !strcmp(path, "/")) {
        fprintf(stderr, "usage: %s -p <absolute volume dir> -a create|delete [-s size] [-m mode]\n", argv[0]);
        return 2;
    }
    if (!strcmp(action, "create")) {
        if (mkdir_p(path)) { perror(path); return 1; }
    } else if (!strcmp(action, "delete")) {
        if (nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS) && errno != ENOENT) { perror(path); return 1; }
    } else {
        fprintf(stderr, "%s: unknown action '%s' (want create or delete)\n", argv[0], action);
        return 2;
    }
    printf("%s %s\n", action, path);
    return 0;
}
