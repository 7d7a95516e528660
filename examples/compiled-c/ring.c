/* Pass a token around the ranks `rounds` times, then check it with an Allreduce.
 * Writes ring.txt in the working directory (the step's output directory). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long rounds = argc > 1 ? atol(argv[1]) : 100;
    long token = 0;
    double t0 = MPI_Wtime();
    for (long r = 0; r < rounds; r++) {
        if (rank == 0) {
            token++;
            MPI_Send(&token, 1, MPI_LONG, (rank + 1) % size, 0, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_LONG, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&token, 1, MPI_LONG, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            token++;
            MPI_Send(&token, 1, MPI_LONG, (rank + 1) % size, 0, MPI_COMM_WORLD);
        }
    }
    double dt = MPI_Wtime() - t0;
    long sum = 0, mine = rank;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
        if (token != rounds * size || sum != (long)size * (size - 1) / 2) {
            fprintf(stderr, "ring: rank 0: token %ld != %ld\n", token, rounds * size);
            MPI_Abort(MPI_COMM_WORLD, 3);
        }
        FILE *f = fopen("ring.txt", "w");
        if (!f) { perror("ring.txt"); MPI_Abort(MPI_COMM_WORLD, 2); }
        fprintf(f, "ranks %d rounds %ld token %ld us_per_hop %.3f\n", size, rounds, token,
                1e6 * dt / (double)(rounds * size));
        fclose(f);
        printf("ring: %d ranks, %ld rounds, token %ld\n", size, rounds, token);
    }
    MPI_Finalize();
    return 0;
}
